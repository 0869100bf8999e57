from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import vcell
from vcell.priors import _drugs

COMPOUNDS = "prior_knowledge/sciplex3_compounds_smiles_targets.csv"


@pytest.fixture(scope="module")
def compounds(shared_data) -> pd.DataFrame:
    return vcell.priors.read_compounds(shared_data / COMPOUNDS)


def test_read_compounds(compounds):
    assert compounds.shape == (189, 7)
    assert compounds.index.name == "compound"
    assert compounds.index.is_unique
    assert {"SMILES", "target", "pathway", "catalog_number", "name"} <= set(compounds.columns)
    assert compounds.loc["Navitoclax (ABT-263)", "target"] == "Bcl-2"
    assert "Glesatinib?(MGCD265)" in compounds.index  # sci-Plex 3's own spelling of product_name
    assert pd.isna(compounds.loc["Vehicle", "SMILES"])


def test_read_compounds_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cmp\.csv.*sci-Plex 3 compound table"):
        vcell.priors.read_compounds(tmp_path / "cmp.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("name,smiles\nA,CCO\n")
    with pytest.raises(ValueError, match=r"\['product_name', 'SMILES'\]"):
        vcell.priors.read_compounds(bad)
    dup = tmp_path / "dup.csv"
    dup.write_text("product_name,SMILES\nA,CCO\nA,CCC\n")
    with pytest.raises(ValueError, match=r"repeats.*\['A'\]"):
        vcell.priors.read_compounds(dup)


def test_fingerprints_on_sciplex(compounds):
    pytest.importorskip("rdkit")
    drugs = compounds.drop(index="Vehicle")
    fp = vcell.priors.drug_fingerprints(drugs["SMILES"])
    assert fp.shape == (188, 1024)
    assert fp.index.equals(drugs.index)
    assert fp.dtypes.eq(np.float32).all()
    assert set(np.unique(fp.to_numpy())) == {0.0, 1.0}
    assert (fp.sum(axis=1) > 5).all()  # every compound parses and sets bits
    # the only identical pair are enantiomers, told apart with use_chirality=True
    assert fp.index[fp.duplicated(keep=False)].tolist() == ["Ruxolitinib (INCB018424)", "S-Ruxolitinib (INCB018424)"]
    assert not vcell.priors.drug_fingerprints(drugs["SMILES"], use_chirality=True).duplicated().any()

    def tanimoto(a: str, b: str) -> float:
        x, y = fp.loc[a].to_numpy(bool), fp.loc[b].to_numpy(bool)
        return (x & y).sum() / (x | y).sum()

    # Navitoclax and ABT-737 are close analogues (both BH3 mimetics); far from e.g. the HDAC inhibitor Dacinostat
    hdac = next(c for c in fp.index if c.startswith("Dacinostat"))
    assert tanimoto("Navitoclax (ABT-263)", "ABT-737") > 0.4
    assert tanimoto("Navitoclax (ABT-263)", "ABT-737") > 2 * tanimoto("Navitoclax (ABT-263)", hdac)


def test_fingerprints_known_bits():
    pytest.importorskip("rdkit")
    from rdkit import Chem
    from rdkit.Chem import rdFingerprintGenerator

    smiles = {"ethanol": "CCO", "benzene": "c1ccccc1"}
    fp = vcell.priors.drug_fingerprints(smiles, radius=1, n_bits=64)
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=1, fpSize=64)
    for name, s in smiles.items():
        np.testing.assert_array_equal(fp.loc[name].to_numpy(), gen.GetFingerprintAsNumPy(Chem.MolFromSmiles(s)))
    # benzene: every atom identical -> radius 0 and radius 1 environments: 2 bits at most
    assert fp.loc["benzene"].sum() <= 2
    assert fp.index.tolist() == ["ethanol", "benzene"]


def test_fingerprint_errors(compounds):
    pytest.importorskip("rdkit")
    with pytest.raises(ValueError, match=r"invalid SMILES for compound 'broken'"):
        vcell.priors.drug_fingerprints({"ok": "CCO", "broken": "C1CC(("})
    with pytest.raises(ValueError, match=r"no SMILES for compound\(s\) \['Vehicle'\].*missing='zero'"):
        vcell.priors.drug_fingerprints(compounds["SMILES"])
    fp = vcell.priors.drug_fingerprints(compounds["SMILES"].iloc[:3], n_bits=128, missing="zero")
    assert (fp.loc["Vehicle"] == 0).all()
    assert (fp.iloc[1:].sum(axis=1) > 0).all()
    with pytest.raises(ValueError, match="repeated"):
        vcell.priors.drug_fingerprints(pd.Series(["CCO", "CCC"], index=["a", "a"]))
    with pytest.raises(ValueError, match="missing"):
        vcell.priors.drug_fingerprints({"a": "CCO"}, missing="skip")


def test_missing_rdkit_gives_install_hint(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_rdkit(name, *args, **kwargs):
        if name == "rdkit" or name.startswith("rdkit."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_rdkit)
    with pytest.raises(ImportError, match=r'pip install "vcell\[drugs\]"'):
        _drugs.drug_fingerprints({"a": "CCO"})
