"""pytest plugin (work in progress this session)."""
