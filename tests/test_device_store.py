"""The device store, its directory and keys, ingest, the history-db data source and the budget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_ssh_private_key,
    load_ssh_public_key,
)
from device_helpers import (
    item_ids,
    make_device,
    message,
    store_context,
    tiny_run,
    user_rows,
    write_csv,
)

from fedinterest.client.app import app as client_app
from fedinterest.client.budget import privacy_budget
from fedinterest.client.data_source import HISTORY_DB, load_device_data
from fedinterest.client.device_dir import (
    DeviceDirError,
    init_device_dir,
    open_device_dir,
)
from fedinterest.client.device_store import StoreError
from fedinterest.client.ingest import ingest_file
from fedinterest.client.ledger import LedgerEntry, PrivacyLedger
from fedinterest.common import wire
from fedinterest.common.catalogue import Catalogue, load_catalogue, write_catalogue
from fedinterest.common.interactions import DataFormatError, SequenceDataset
from fedinterest.common.model import InterestModel
from fedinterest.common.split import leave_one_out

# --- catalogue -----------------------------------------------------------------------------


def test_catalogue_round_trip_maps_line_to_index(tmp_path: Path) -> None:
    path = write_catalogue(tmp_path / "catalogue.txt", ["a", "b", "c"])
    assert path.read_text(encoding="utf-8") == "a\nb\nc\n"
    catalogue = load_catalogue(path)
    assert len(catalogue) == 3 and catalogue.index("b") == 2 and catalogue.item(3) == "c"
    assert catalogue.index("zzz") is None
    with pytest.raises(IndexError):
        catalogue.item(0)  # PAD_ID names no item


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "empty"), ("a\nb\na\n", r":3: item id 'a' appears again \(first on line 1\)"), ("a\n\nb\n", ":2: blank line")],
)
def test_bad_catalogue_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "catalogue.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataFormatError, match=message):
        load_catalogue(path)


def test_write_catalogue_refuses_duplicates_and_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="appears again"):
        write_catalogue(tmp_path / "catalogue.txt", ["a", "a"])
    assert not list(tmp_path.iterdir())


# --- device directory ----------------------------------------------------------------------


def test_init_makes_openssh_ec_keys_and_a_store_and_refuses_to_overwrite(tmp_path: Path) -> None:
    device = make_device(tmp_path, num_items=12)
    private = load_ssh_private_key(device.private_key.read_bytes(), None)
    public = load_ssh_public_key(device.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    assert device.private_key.stat().st_mode & 0o077 == 0
    with device.store() as store:
        assert store.catalogue() == Catalogue(item_ids(12))
    with pytest.raises(DeviceDirError, match="refusing to overwrite"):
        init_device_dir(device.root, tmp_path / "device-catalogue.txt")
    assert open_device_dir(device.root) == device


def test_flower_accepts_the_device_public_key(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    assert try_load_public_key(make_device(tmp_path).public_key)


def test_an_uninitialised_directory_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(DeviceDirError, match="no device directory"):
        open_device_dir(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeviceDirError, match="not an initialised device directory"):
        open_device_dir(tmp_path / "empty")


def test_init_with_a_bad_catalogue_creates_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "catalogue.txt"
    bad.write_text("a\na\n", encoding="utf-8")
    with pytest.raises(DataFormatError):
        init_device_dir(tmp_path / "device", bad)
    assert not (tmp_path / "device").exists()


# --- ingest --------------------------------------------------------------------------------


def test_ingest_is_idempotent(tmp_path: Path) -> None:
    device = make_device(tmp_path)
    path = write_csv(tmp_path / "history.csv", user_rows("u1", ["m3", "m1", "m2", "m5"]))
    with device.store() as store:
        first = ingest_file(store, path)
        again = ingest_file(store, path)
        assert (first.rows_added, first.already_imported) == (4, False)
        assert (again.rows_added, again.already_imported) == (0, True)
        # Another file overlapping the first adds only the new interaction.
        overlap = write_csv(tmp_path / "more.csv", user_rows("u1", ["m3", "m1", "m2", "m5", "m9"]))
        more = ingest_file(store, overlap)
        assert (more.rows_added, more.duplicates) == (1, 4)
        assert store.raw_history() == ["m3", "m1", "m2", "m5", "m9"]
        assert store.counts()["store_events"] == 5


def test_ingest_is_all_or_nothing_on_a_bad_row(tmp_path: Path) -> None:
    device = make_device(tmp_path)
    path = tmp_path / "history.csv"
    path.write_text("user,item,timestamp\nu1,m1,10\nu1,m2,11\nu1,m3,not-a-time\nu1,m4,13\n", encoding="utf-8")
    with device.store() as store:
        with pytest.raises(DataFormatError, match=r"history.csv:4: timestamp 'not-a-time'"):
            ingest_file(store, path)
        assert store.raw_history() == [] and store.counts()["store_imports"] == 0 and store.user_id() is None


def test_a_failing_write_rolls_back_the_whole_import(tmp_path: Path) -> None:
    device = make_device(tmp_path)
    with device.store() as store:
        with pytest.raises(IndexError):
            # The row generator fails at the third row, inside the transaction: the first two must not stay.
            store.import_interactions(
                items=["m1", "m2", "m3", "m4"], timestamps=np.arange(2.0), ratings=None, lines=None,
                user_id="u1", source="x.csv", fmt="csv", sha256="0" * 64,
            )
        assert store.raw_history() == [] and store.counts()["store_imports"] == 0 and store.user_id() is None


def test_a_file_with_several_users_needs_user(tmp_path: Path) -> None:
    device = make_device(tmp_path)
    path = write_csv(tmp_path / "two.csv", user_rows("u1", ["m1", "m2"]) + user_rows("u2", ["m3", "m4", "m5"]))
    with device.store() as store:
        with pytest.raises(DataFormatError, match="holds 2 users .* pass --user ID"):
            ingest_file(store, path)
        assert ingest_file(store, path, user="u2").rows_added == 3
        assert store.user_id() == "u2" and store.raw_history() == ["m3", "m4", "m5"]
        with pytest.raises(StoreError, match="holds the history of user 'u2', not of user 'u1'"):
            ingest_file(store, path, user="u1")
        with pytest.raises(DataFormatError, match="no interactions of user 'u9'"):
            ingest_file(store, path, user="u9")


def test_ingest_reads_the_loaders_formats(tmp_path: Path) -> None:
    device = make_device(tmp_path)
    path = tmp_path / "u.data"
    path.write_text("7\t3\t4\t100\n7\t1\t5\t50\n7\t2\t3\t75\n", encoding="utf-8")
    with device.store() as store:
        with pytest.raises(ValueError, match="pass --format"):
            ingest_file(store, path)
        ingest_file(store, path, fmt="ml-100k")
        assert store.raw_history() == ["1", "2", "3"]  # by time, not file order


def test_unknown_items_are_kept_but_not_used(tmp_path: Path) -> None:
    device = make_device(tmp_path, num_items=10)
    path = write_csv(tmp_path / "h.csv", user_rows("u1", ["m1", "new-1", "m2", "m3", "new-2", "m4"]))
    with device.store() as store:
        result = ingest_file(store, path)
        assert result.unknown_items == 2 and result.rows_added == 6
        history = store.history()
    assert history.indices.tolist() == [1, 2, 3, 4] and history.unknown == 2 and history.total == 6


# --- data source in history-db mode ----------------------------------------------------------


def test_history_db_mode_splits_like_simulation_and_keeps_the_ledger_in_the_store(tmp_path: Path) -> None:
    device = make_device(tmp_path, num_items=10)
    items = ["m4", "m2", "unknown", "m7", "m1", "m9", "m3"]
    with device.store() as store:
        ingest_file(store, write_csv(tmp_path / "h.csv", user_rows("u1", items)))
    data = load_device_data({HISTORY_DB: str(device.store_path)}, tiny_run(10))
    indices = np.array([4, 2, 7, 1, 9, 3])
    expected = leave_one_out(SequenceDataset("x", ("u1",), tuple(item_ids(10)), (indices,))).users[0]
    assert data.user.train.tolist() == expected.train.tolist() == [4, 2, 7, 1]
    assert (data.user.valid, data.user.test) == (9, 3)
    assert data.num_items == 10 and data.unknown_items == 1
    assert data.ledger_path == device.store_path == data.store_path


def test_history_db_mode_refuses_a_catalogue_of_another_size(tmp_path: Path) -> None:
    device = make_device(tmp_path, num_items=10)
    with device.store() as store:
        ingest_file(store, write_csv(tmp_path / "h.csv", user_rows("u1", ["m1", "m2", "m3"])))
    with pytest.raises(ValueError, match="catalogue has 10 items but the run's num-items is 11"):
        load_device_data({HISTORY_DB: str(device.store_path)}, tiny_run(11))


def test_a_device_with_too_little_history_trains_on_noise_and_evaluates_nothing(tmp_path: Path) -> None:
    device = make_device(tmp_path)
    with device.store() as store:
        ingest_file(store, write_csv(tmp_path / "h.csv", user_rows("u1", ["m1", "m2"])))
    run = tiny_run(40)
    assert load_device_data({HISTORY_DB: str(device.store_path)}, run).user is None
    model = InterestModel(run.model_config(40))
    trained = client_app(message("train", model, {wire.SERVER_ROUND: 1}), store_context(device.store_path, run))
    # With DP-SGD a device without windows sends a noise-only update like any other
    # (docs/privacy.md: a missing model would tell the server it has no window).
    assert not trained.has_error() and wire.ARRAYS in trained.content.array_records
    assert trained.content[wire.METRICS][wire.NUM_EXAMPLES] == 1 and trained.content[wire.METRICS][wire.REFUSED] == 0.0
    evaluated = client_app(message("evaluate", model, {wire.STAGE: "test"}), store_context(device.store_path, run))
    assert not evaluated.has_error() and evaluated.content[wire.METRICS][wire.NUM_EXAMPLES] == 0
    with PrivacyLedger(device.store_path) as ledger:
        assert [e.server_round for e in ledger.entries()] == [1]  # the noise-only round is charged like any other


def test_history_db_mode_errors_name_the_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no device store here"):
        load_device_data({HISTORY_DB: str(tmp_path / "missing.sqlite")}, tiny_run(40))


# --- budget and ledger durability ---------------------------------------------------------------


def test_budget_reflects_the_ledger_rows(tmp_path: Path) -> None:
    device = make_device(tmp_path)
    with device.store() as store:
        empty = privacy_budget(store)
        assert (empty.epsilon, empty.rounds, empty.remaining, empty.settings_from) == (0.0, 0, 8.0, "defaults")
        with PrivacyLedger(device.store_path) as ledger:
            ledger.record(LedgerEntry(1, 1, 1.0, 0.5, 2))
            ledger.record(LedgerEntry(1, 2, 1.0, 0.5, 2))
            expected = ledger.epsilon(1e-5)
        report = privacy_budget(store, budget=10.0)
    assert report.rounds == 2 and report.steps == 4
    assert report.epsilon == pytest.approx(7.4097336, rel=1e-6) == expected
    assert report.remaining == pytest.approx(10.0 - expected) and report.settings_from == "given"


def test_the_store_ledger_survives_a_process_restart(tmp_path: Path) -> None:
    device = make_device(tmp_path)
    script = (
        "import sys; from fedinterest.client.ledger import LedgerEntry, PrivacyLedger\n"
        "with PrivacyLedger(sys.argv[1]) as l:\n"
        "    l.record(LedgerEntry(5, int(sys.argv[2]), 1.0, 0.25, 3))\n"
        "    print(repr(l.epsilon(1e-5)))\n"
    )
    outputs = [
        subprocess.run([sys.executable, "-c", script, str(device.store_path), str(r)], check=True, capture_output=True, text=True).stdout
        for r in (1, 2)
    ]
    with device.store() as store:
        report = privacy_budget(store)
        assert store.integrity_check() == "ok"
    assert report.rounds == 2 and report.epsilon == float(outputs[1]) > float(outputs[0]) > 0
