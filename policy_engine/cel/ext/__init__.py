"""cel-go's extension libraries (``ext``), with cel-go's names and semantics.

Each module holds one library's functions as :class:`policy_engine.cel.functions.Function`
values (``FUNCTIONS``); :mod:`policy_engine.cel.library` merges them with the standard
functions and the project's helpers.
"""
