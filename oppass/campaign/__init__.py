"""Fault-injection campaigns (the paper's Alg. 1, Table II and Fig. 4-6): see docs/METHODS.md."""

from oppass.campaign.config import CampaignConfig
from oppass.campaign.runner import CampaignResult, run_campaign

__all__ = ["CampaignConfig", "CampaignResult", "run_campaign"]
