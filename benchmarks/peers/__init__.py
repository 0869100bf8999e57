"""Peer adapters: GEARS, scGen, STATE and CellFlow as :class:`vcell.bench.Predictor` objects (see README.md)."""
