"""Installing an operator's bundle on a device: checksums verified, catalogue compared with the device's.

A bundle ranks the items of its own catalogue and maps the user's history onto it by
raw item id. A bundle whose catalogue shares no item with the device's was made for
another federation: it would rank items the device has never heard of from no history
at all (issue 16). Such a bundle is refused unless the owner says it is meant
(`allow_other_catalogue`); a partial overlap is installed and reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedinterest.client.device_store import DeviceStore
from fedinterest.common.bundle import BundleError, load_bundle


class ForeignCatalogueError(BundleError):
    """The bundle's catalogue shares no item with the device's."""


@dataclass(frozen=True)
class InstalledBundle:
    """What `install_bundle` kept, and how the bundle's catalogue relates to the device's."""

    model_id: int
    sha256: str
    catalogue_items: int
    shared_items: int  # bundle items the device's catalogue also lists
    card: dict


def install_bundle(store: DeviceStore, bundle: Path, *, expected_sha256: str | None = None, allow_other_catalogue: bool = False) -> InstalledBundle:
    """Verify `bundle` and keep it as the device's latest model; ForeignCatalogueError when no item is shared."""
    loaded = load_bundle(bundle, expected_sha256=expected_sha256)
    device_catalogue = store.catalogue()
    shared = sum(1 for item in loaded.catalogue.ids if item in device_catalogue)
    if shared == 0 and not allow_other_catalogue:
        raise ForeignCatalogueError(
            f"{bundle}: its catalogue ({len(loaded.catalogue)} items, e.g. {loaded.catalogue.item(1)!r}) shares no item "
            f"with this device's ({len(device_catalogue)} items, e.g. {device_catalogue.item(1)!r}, {store.path}); "
            "it was made for another federation. Nothing was installed; pass --allow-other-catalogue if it is meant"
        )
    model_id = store.save_model("bundle", bundle.read_bytes(), {"source": str(bundle.resolve()), "card": loaded.card})
    return InstalledBundle(model_id, loaded.sha256, len(loaded.catalogue), shared, loaded.card)
