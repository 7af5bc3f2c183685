"""Parts every stage shares (the one table of model families; see ``families``)."""
