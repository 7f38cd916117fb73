"""Reports for people: the configuration reference and the per-run report (``bvpo report``)."""
