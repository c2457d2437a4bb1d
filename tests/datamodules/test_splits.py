"""Subject splits: disjoint, complete, stable across processes, and strict about split files."""

import pytest

from datamodules.splits import Split, hash_split, load_split_file
from lfmri_utils.errors import InputError
from lfmri_utils.seeding import stable_hash

SUBJECTS = [f"sub-{i:02d}" for i in range(30)]


def test_stable_hash_is_a_pure_function_of_its_parts():
    assert stable_hash(0, "sub-01", 3) == stable_hash(0, "sub-01", 3)
    assert stable_hash(0, "sub-01", 3) != stable_hash(1, "sub-01", 3)
    # pinned: the same on every machine and Python version (sha256, not hash())
    assert stable_hash("split", 0, "sub-01") == stable_hash("split", "0", "sub-01")


def test_hash_split_is_disjoint_complete_and_seeded():
    split = hash_split(SUBJECTS, seed=0, val_fraction=0.1, test_fraction=0.2)
    sets = [set(split.train), set(split.val), set(split.test)]
    assert sum(len(s) for s in sets) == len(SUBJECTS)
    assert set.union(*sets) == set(SUBJECTS)
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert split.sizes() == {"train": 21, "val": 3, "test": 6}
    assert hash_split(list(reversed(SUBJECTS)), seed=0, val_fraction=0.1, test_fraction=0.2) == split
    assert hash_split(SUBJECTS, seed=1, val_fraction=0.1, test_fraction=0.2).test != split.test


def test_small_sets_get_one_val_and_one_test_subject():
    split = hash_split(["a", "b", "c"], seed=0)
    assert split.sizes() == {"train": 1, "val": 1, "test": 1}


def test_one_subject_in_two_splits_is_refused():
    with pytest.raises(InputError, match="sub-01"):
        Split(train=["sub-01"], test=["sub-01"])


def test_split_file(tmp_path):
    path = tmp_path / "split.yaml"
    path.write_text("train: [sub-00, sub-01]\ntest: [sub-02]\n")
    split = load_split_file(path, SUBJECTS)
    assert split.sizes() == {"train": 2, "val": 0, "test": 1}


def test_split_file_naming_an_unknown_subject_names_file_and_subject(tmp_path):
    path = tmp_path / "split.yaml"
    path.write_text("train: [sub-00, sub-99]\n")
    with pytest.raises(InputError, match=r"split\.yaml.*sub-99"):
        load_split_file(path, SUBJECTS)


def test_split_file_with_a_subject_twice_or_bad_keys(tmp_path):
    path = tmp_path / "split.yaml"
    path.write_text("train: [sub-00]\nval: [sub-00]\n")
    with pytest.raises(InputError, match=r"split\.yaml.*sub-00"):
        load_split_file(path, SUBJECTS)
    path.write_text("training: [sub-00]\n")
    with pytest.raises(InputError, match=r"split\.yaml"):
        load_split_file(path, SUBJECTS)
