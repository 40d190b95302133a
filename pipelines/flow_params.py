"""params.yaml section `flow` (the scheduled deployment), apart from the flow so that checking a params file does
not import Prefect (~2 s); only `validate()` does, to check the schedule."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FlowParams:
    """params.yaml section `flow`: the scheduled deployment."""

    deployment_name: str = "campe-scheduled"
    cron: str = "0 3 * * *"  # every day at 03:00
    timezone: str = "UTC"
    generate: bool = True  # run the generator first (embedded default); false for real datasets
    generated_dir: str = "data/generated"

    def validate(self) -> None:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=self.cron, timezone=self.timezone)
        except Exception as e:  # pydantic names what is wrong with the expression
            raise ValueError(f"cron {self.cron!r} / timezone {self.timezone!r} is not a valid schedule: {e}") from None
