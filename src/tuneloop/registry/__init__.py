"""Run records: what each artefact was made from, read back by export, serve and the registry."""

from tuneloop.registry.records import (
    RECORD_FILE,
    file_fingerprint,
    read_record,
    software_versions,
    update_record,
    write_json_atomic,
)

__all__ = ["RECORD_FILE", "file_fingerprint", "read_record", "software_versions", "update_record", "write_json_atomic"]
