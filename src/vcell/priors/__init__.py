"""Prior knowledge: gene graphs, GO similarity, regulatory networks, gene sets and drug featurisation.

Every loader reads a local file; :func:`read_network` also fetches decoupler's resources by name (online).

* :func:`read_gene_graph` - gene-gene graph in GEARS' format (``source``, ``target``, ``importance``).
* :func:`go_graph` - the GEARS-style GO graph (Jaccard of GO-term sets, thresholded, top-k neighbours per gene).
* :func:`graph_embedding` - fixed gene embedding from a gene graph (regularised spectral coordinates), giving genes
  never perturbed in training a row from their graph neighbours.
* :func:`read_network` - decoupler-format networks (CollecTRI, DoRothEA, PROGENy, any csv/tsv/gmt).
* :func:`read_gmt` - GMT gene sets (e.g. MSigDB Hallmark) as a decoupler-format network.
* :func:`read_compounds` / :func:`drug_fingerprints` - sci-Plex 3 compound table; Morgan fingerprints (RDKit,
  ``pip install "vcell[drugs]"``).

Importing this module loads only numpy, pandas and scipy; decoupler and RDKit are imported inside the functions
that need them.
"""

from __future__ import annotations

from ._drugs import drug_fingerprints, read_compounds
from ._embedding import graph_embedding
from ._graph import go_graph, read_gene_graph
from ._networks import read_gmt, read_network

__all__ = [
    "drug_fingerprints",
    "go_graph",
    "graph_embedding",
    "read_compounds",
    "read_gene_graph",
    "read_gmt",
    "read_network",
]
