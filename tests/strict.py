"""What the real-model (slow) tests need: skipped where it is missing, but a failure where the environment says it
must be there (`.ci/run` sets TRANSMLA_REQUIRE_REAL_MODEL=1), so that CI can not pass by skipping them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class Require:
    @property
    def strict(self) -> bool:
        return os.environ.get("TRANSMLA_REQUIRE_REAL_MODEL") == "1"

    def that(self, condition: bool, reason: str) -> None:
        """Skip this module unless `condition`; fail it instead in strict mode."""
        if condition:
            return
        if self.strict:
            pytest.fail(f"{reason} (TRANSMLA_REQUIRE_REAL_MODEL=1)", pytrace=False)
        pytest.skip(reason, allow_module_level=True)

    def shared_data(self) -> Path:
        """../shared/data (WikiText-2), beside the checkout."""
        self.that(SHARED_DATA.is_dir(), f"needs the WikiText-2 files in {SHARED_DATA}")
        return SHARED_DATA


require = Require()
