"""The decision audit log: one tamper-evident record per decision, written off the request path.

`AuditLog` (writer.py) is what the server uses; `record.py` builds records, `chain.py` chains
and signs them, `sinks/` write them, `verify.py` and `tail.py` read them back for people.
"""

from policy_engine.audit.record import (
    SCHEMA_VERSION,
    build_invalid_record,
    build_record,
    load_schema,
)
from policy_engine.audit.writer import AuditLog, AuditStats, build_sinks

__all__ = [
    "SCHEMA_VERSION",
    "AuditLog",
    "AuditStats",
    "build_invalid_record",
    "build_record",
    "build_sinks",
    "load_schema",
]
