"""CausalVAE with a drug encoder: Morgan fingerprints of the sci-Plex 3 compounds as the perturbation embedding."""

from __future__ import annotations

import numpy as np
import pytest

import vcell

pytest.importorskip("rdkit")

QUIET = {"enable_progress_bar": False}


def test_fingerprint_table_predicts_an_unseen_drug(shared_data):
    compounds = vcell.priors.read_compounds(shared_data / "prior_knowledge" / "sciplex3_compounds_smiles_targets.csv")
    drugs = [c for c in compounds.index if c != "Vehicle"][:5]
    fps = vcell.priors.drug_fingerprints(compounds.loc[drugs, "SMILES"], n_bits=256)
    assert fps.shape == (5, 256)
    adata = vcell.datasets.simulate(n_cells=300, n_genes=30, n_perturbations=5, n_combos=0, doses=[0.1, 1.0], seed=0)
    names = dict(zip(adata.uns["vcell_simulation"]["perturbations"], drugs, strict=True))
    adata.obs["perturbation"] = adata.obs["perturbation"].astype(str).map(lambda p: names.get(p, p))
    unseen = drugs[-1]
    train = adata[adata.obs["perturbation"] != unseen].copy()
    vcell.model.CausalVAE.setup_anndata(train, perturbation_key="perturbation", control="control", dose_key="dose")
    model = vcell.model.CausalVAE(train, n_latent=4, n_hidden=16, perturbation_embedding=fps)
    assert unseen in model.atoms_
    model.train(max_epochs=2, seed=0, accelerator="cpu", trainer_kwargs=QUIET)
    pred = model.predict(perturbation=unseen, dose=0.5)
    assert pred.shape[1] == train.n_vars
    assert np.isfinite(pred).all()
    # the unseen drug's operator is a function of its fingerprint: another fingerprint, another operator
    emb = model.get_perturbation_embedding()
    assert not np.allclose(emb.loc[unseen], emb.loc[drugs[0]])
