"""The hot-reloaded policy store: the serving policy set, its status, and what reloads it."""

from policy_engine.store.backend import (
    DirectoryBackend,
    FilesBeingWritten,
    PolicyBackend,
    SourceChangedDuringLoad,
)
from policy_engine.store.reloader import PolicyReloader
from policy_engine.store.store import (
    NoPolicyLoaded,
    PolicyStore,
    ReloadResult,
    StoreStatus,
)

__all__ = [
    "DirectoryBackend",
    "FilesBeingWritten",
    "NoPolicyLoaded",
    "PolicyBackend",
    "PolicyReloader",
    "PolicyStore",
    "ReloadResult",
    "SourceChangedDuringLoad",
    "StoreStatus",
]
