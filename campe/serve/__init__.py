"""`campe serve`: the search page (campe.serve.app) over a cached image index (campe.serve.index)."""
