"""Sources of ECG (DESIGN §5): MQTT (`mqtt`), BLE (`ble`), files (`replay`), synthetic
(`synthetic`). Each is an async iterator of `EcgChunk` | `SourceStatus` (BLE heart rate:
`RrIntervals`); `validate.ChunkChecker` checks a device's chunks for the engine.

Only the light, numpy-only names are imported here; import a source from its module.
"""
from .chunk import UNIT_TO_MV, EcgChunk
from .status import SourceStatus
from .validate import CheckResult, ChunkChecker, Decision, Issue

__all__ = ["UNIT_TO_MV", "EcgChunk", "SourceStatus", "CheckResult", "ChunkChecker", "Decision", "Issue"]
