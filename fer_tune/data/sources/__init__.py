"""Dataset sources: adapters that turn a dataset on disk into one table, and read its images.

Every source produces ONE `pandas.DataFrame`, one row per image, with the columns in `COLUMNS`:

- ``image``: the image path relative to the dataset root (posix separators); for the synthetic
  source ``"synthetic/000123"``;
- ``expression``: int AffectNet id 0..7 (see `fer_tune.EXPRESSIONS`), -1 when unlabelled;
- ``valence``, ``arousal``: float in [-1, 1], NaN when missing;
- ``subject``: str, ``""`` when unknown;
- ``source_split``: ``"train"``, ``"val"``, ``"test"`` or ``""``: the split the dataset assigns;
- ``face_x``, ``face_y``, ``face_w``, ``face_h``: face box in pixels, NaN when the image is
  already a face crop.

``table.attrs["dropped"]`` maps a reason to the number of rows (or files) left out, and
``table.attrs["tasks"]`` lists the tasks with at least one label, among
``["expression", "valence", "arousal"]``.

Sources live in a timm-style registry: ``@register_source("name")`` on a `Source` subclass (or a
plain ``load(data) -> DataFrame`` function) fills `SOURCES`; `load_table` and `read_image`
dispatch on ``data.source``. Each built-in source is one module of this package (``synthetic``,
``affectnet``, ``affectnet_npy``, ``folder``, ``csv``), registered when the package is imported;
the table's checks (``_table``), path safety (``_paths``) and the registry (``_registry``) are
private modules. ``data`` is the project's ``DataSpec``; only ``data.source``,
``data.root`` and ``data.synthetic.{n,seed,label_noise,identities}`` are used.

Bad input raises `fer_tune.errors.UserError` with a one-line message; an unreadable image raises
`BadImage` (not a UserError: the caller collects those and decides).
"""

from fer_tune import TASKS
from fer_tune.data.images import IMAGE_EXTENSIONS, BadImage
from fer_tune.data.sources._registry import SOURCES, Source, load_table, read_image, register_source
from fer_tune.data.sources._table import COLUMNS, EXPRESSION_ALIASES, expression_id
from fer_tune.data.sources.affectnet_npy import NPY_SPLIT_FOLDERS
from fer_tune.data.sources.folder import SPLIT_FOLDERS

# The built-in sources register themselves on import, like timm's model modules.
from fer_tune.data.sources import affectnet, affectnet_npy, csv, folder, synthetic  # noqa: E402,F401  isort: skip

__all__ = [
    "COLUMNS",
    "TASKS",
    "IMAGE_EXTENSIONS",
    "EXPRESSION_ALIASES",
    "SPLIT_FOLDERS",
    "NPY_SPLIT_FOLDERS",
    "SOURCES",
    "BadImage",
    "Source",
    "register_source",
    "load_table",
    "read_image",
    "expression_id",
]
