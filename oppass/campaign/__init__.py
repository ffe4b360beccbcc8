"""Fault-injection campaigns (the paper's Alg. 1, Table II and Fig. 4-6): see docs/METHODS.md.

Campaigns need the `campaign` extra (`pip install 'oppass[campaign]'`); `run_campaign` and
`CampaignResult` are imported on first use, so importing this package (the command line does,
to list `oppass campaign`) needs none of it.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from oppass.campaign.config import CampaignConfig
from oppass.errors import OppassError

if TYPE_CHECKING:
    from oppass.campaign.runner import CampaignResult, run_campaign

# The modules of the `campaign` extra that campaigns import (PIL: image-folder data sets).
EXTRA_MODULES = ("dask", "distributed", "matplotlib", "PIL", "scipy")
INSTALL_EXTRA = "pip install 'oppass[campaign]'"

__all__ = ["CampaignConfig", "CampaignResult", "check_extra", "run_campaign"]


def check_extra() -> None:
    """Refuses, in one line that says what to install, to go on when a module of the campaign extra is missing."""
    missing = [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise OppassError(f"campaigns need {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                          f"not installed: {INSTALL_EXTRA}")


def __getattr__(name: str) -> object:
    if name not in ("CampaignResult", "run_campaign"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("oppass.campaign.runner"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
