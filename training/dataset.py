"""The training set: images, camera labels, meshes and landmarks (SPEC section 8).

Layout (a folder, or a zip of the same tree)::

    <root>/images{R}x{R}/00000/img00000000.png
    <root>/images{R}x{R}/dataset.json        {"labels": [[relpath, [25 floats]], ...]}
    <root>/images{R}x{R}/dataset_exp.json    optional: {"labels": [[relpath, [E floats]], ...]}
    <root>/meshes{R}x{R}/00000/img00000000.obj
    <root>/lms{R}x{R}/00000/img00000000.txt  (68 x 3, iBUG order, canonical mesh metres)

`path` may name the root, the images folder itself (Next3D's `--data`), or a zip of
either. The original's `dataset_mead.json` is accepted as the label file's name.
`mesh_path` (Next3D's `--rdata`) overrides the meshes folder; its landmarks folder is the
sibling whose name has 'meshes' replaced by 'lms'.

Packed datasets (written by dataset_tool.py) hold, next to dataset.json, `vertices.npy`
(N, V, 3) and `landmarks.npy` (N, 68, 3) float32 in the order of dataset.json's labels;
they load without parsing any .obj file.

Mirroring (`xflip`): item i + N is item i mirrored about the x = 0 plane of the world
(= of mesh space, whose shift has no x part): the image is flipped left-right; the
camera label becomes S @ cam2world @ S with S = diag(-1, 1, 1, 1) (EG3D's `flip_yaw`:
entries (0,1), (0,2), (0,3), (1,0), (2,0) negated) and the principal point cx -> 1 - cx;
landmark positions have x negated and are re-ordered with iBUG's mirror permutation
(`LANDMARK_MIRROR`), so point 36 is again the outer corner of the image-left eye.
Mesh vertices have x negated and are re-ordered with a vertex mirror permutation (vertex
i takes the mirrored position of its symmetric partner) so that faces keep their winding
and UVs keep their meaning. The permutation is the nearest mirrored neighbour of each
vertex of a symmetric reference: the template mesh (`mirror_template`) when given, else
the dataset's first mesh; it must be a bijection or the dataset refuses to mirror.
Expression values (dataset_exp.json) are left unchanged by mirroring.
"""

import json
import os
import re
import tempfile
import zipfile
import zlib

import numpy as np
import PIL.Image
import torch

from training.coords import LANDMARK_MIRROR

LABEL_FILES = ('dataset.json', 'dataset_mead.json')   # the second is the original's name
EXP_FILE = 'dataset_exp.json'
PACKED_VERTICES = 'vertices.npy'
PACKED_LANDMARKS = 'landmarks.npy'
NUM_LANDMARKS = 68
CAMERA_LABEL_DIM = 25
IMAGE_EXTS = ('.png', '.jpg', '.jpeg')
FULL_VALIDATION_MAX = 2000      # datasets up to this size have every file checked up front



class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file and the problem."""


# ----------------------------------------------------------------------------------------
# File access: a folder or a zip, through one interface.

class _Files:
    """Read-only access to the files below a folder or inside a zip, by '/'-separated name."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self._zip = None
        self._zip_pid = None
        if os.path.isdir(self.path):
            self.is_zip = False
            names = []
            for root, _dirs, files in os.walk(self.path):
                for f in files:
                    names.append(os.path.relpath(os.path.join(root, f), self.path).replace(os.sep, '/'))
        elif os.path.isfile(self.path) and zipfile.is_zipfile(self.path):
            self.is_zip = True
            try:
                with zipfile.ZipFile(self.path) as z:
                    names = [n for n in z.namelist() if not n.endswith('/')]
            except (zipfile.BadZipFile, OSError) as e:
                raise DatasetError(f'{self.path}: damaged zip file ({e})') from e
        elif os.path.isfile(self.path) and _starts_like_a_zip(self.path):
            raise DatasetError(f'{self.path}: damaged zip file (no central directory: truncated?)')
        elif os.path.exists(self.path):
            raise DatasetError(f'{self.path}: not a folder or a zip file')
        else:
            raise DatasetError(f'{self.path}: no such dataset folder or zip')
        self.names = set(names)

    def where(self, name: str) -> str:
        return f'{self.path}:{name}' if self.is_zip else os.path.join(self.path, name)

    def read(self, name: str) -> bytes:
        if name not in self.names:
            raise DatasetError(f'{self.where(name)}: missing')
        if self.is_zip:
            try:
                # Opened lazily, once per process: a handle inherited through fork (DataLoader
                # workers) shares its file offset with the parent's, and racing reads corrupt both.
                if self._zip is None or self._zip_pid != os.getpid():
                    self._zip = zipfile.ZipFile(self.path)
                    self._zip_pid = os.getpid()
                return self._zip.read(name)
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                raise DatasetError(f'{self.where(name)}: damaged zip member ({e})') from e
        with open(os.path.join(self.path, name), 'rb') as f:
            return f.read()

    def local_path(self, name: str) -> str:
        """A path on disk holding the file (zip members are extracted to a temporary file)."""
        if not self.is_zip:
            return os.path.join(self.path, name)
        suffix = os.path.splitext(name)[1]
        fd, tmp = tempfile.mkstemp(suffix=suffix)
        with os.fdopen(fd, 'wb') as f:
            f.write(self.read(name))
        return tmp

    def close(self):
        if self._zip is not None and self._zip_pid == os.getpid():
            self._zip.close()
        self._zip = None

    def __getstate__(self):
        return dict(self.__dict__, _zip=None)


def _starts_like_a_zip(path: str) -> bool:
    """The first bytes are a zip member header (a zip whose end, the central directory, is missing)."""
    with open(path, 'rb') as f:
        return f.read(4) == b'PK\x03\x04'


def _read_vertices(files: _Files, name: str, expected_count: int = None) -> np.ndarray:
    """(V, 3) float32 vertices of an .obj inside `files`."""
    from training.mesh import obj_io
    path = files.local_path(name)
    try:
        return np.asarray(obj_io.read_obj_vertices(path, expected_count), dtype=np.float32)
    except (ValueError, OSError) as e:
        raise DatasetError(_name_file(e, path, files.where(name))) from e
    finally:
        if files.is_zip:
            os.remove(path)


def _name_file(error: Exception, path: str, where: str) -> str:
    """The reader's message with the (possibly temporary) path replaced by the dataset's name for the file."""
    msg = str(error).replace(path, where)
    return msg if where in msg else f'{where}: {msg}'


def _read_landmarks(files: _Files, name: str) -> np.ndarray:
    """(68, 3) float32 landmarks of a .txt inside `files`."""
    from training.mesh import obj_io
    path = files.local_path(name)
    try:
        lms = np.asarray(obj_io.read_landmarks(path), dtype=np.float32)
    except (ValueError, OSError) as e:
        raise DatasetError(_name_file(e, path, files.where(name))) from e
    finally:
        if files.is_zip:
            os.remove(path)
    if lms.shape != (NUM_LANDMARKS, 3) or not np.isfinite(lms).all():
        raise DatasetError(f'{files.where(name)}: expected {NUM_LANDMARKS} finite 3D landmarks, got shape {lms.shape}')
    return lms


def _decode_image(files: _Files, name: str) -> np.ndarray:
    """(3, H, W) uint8 RGB."""
    import io
    data = files.read(name)
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            img = np.asarray(img.convert('RGB'))
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f'{files.where(name)}: unreadable image ({e})') from e
    return img.transpose(2, 0, 1)


def _load_json(files: _Files, name: str):
    try:
        return json.loads(files.read(name))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f'{files.where(name)}: not valid JSON ({e})') from e


def _labels_from_json(files: _Files, name: str, width: int = None) -> dict:
    """{relpath: float32 array} from a {"labels": [[relpath, [floats]], ...]} file."""
    data = _load_json(files, name)
    entries = data.get('labels') if isinstance(data, dict) else None
    if not isinstance(entries, (list, dict)):
        raise DatasetError(f'{files.where(name)}: expected {{"labels": [[relpath, [floats]], ...]}}')
    if isinstance(entries, dict):
        entries = list(entries.items())
    labels = {}
    for entry in entries:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise DatasetError(f'{files.where(name)}: malformed entry {str(entry)[:80]}: expected [relpath, [floats]]')
        relpath, value = entry
        try:
            value = np.asarray(value, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise DatasetError(f'{files.where(name)}: label of {relpath} is not a list of numbers') from None
        if width is not None and value.size != width:
            raise DatasetError(f'{files.where(name)}: label of {relpath} has {value.size} values, expected {width}')
        if not np.isfinite(value).all():
            raise DatasetError(f'{files.where(name)}: label of {relpath} holds non-finite values')
        labels[relpath.replace('\\', '/')] = value.astype(np.float32)
    return labels


def _mirror_permutation(reference: np.ndarray, where: str) -> np.ndarray:
    """(V,) index of each vertex's mirror partner: nearest neighbour of the x-mirrored reference.

    Coincident vertices (seams: several vertices at one position) form groups; the
    vertices whose mirrors fall on a group take its members in index order, so the map is
    a bijection whenever the reference is symmetric.
    """
    ref = torch.from_numpy(reference.astype(np.float64))
    mirrored = ref * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    nearest = torch.cdist(mirrored, ref).argmin(dim=1).numpy()
    _, group = np.unique(np.round(reference.astype(np.float64) / 1e-7), axis=0, return_inverse=True)
    group = group.reshape(-1)
    perm = np.empty(len(reference), dtype=np.int64)
    for g in np.unique(group[nearest]):
        sources = np.flatnonzero(group[nearest] == g)
        members = np.flatnonzero(group == g)
        if len(sources) != len(members):
            raise DatasetError(f'{where}: the mesh is not left-right symmetric (no one-to-one vertex mirror map); '
                               'mirroring (--mirror) needs a symmetric topology (give the symmetric template mesh: --topology_path)')
        perm[sources] = members
    if len(np.unique(perm)) != len(perm):
        raise DatasetError(f'{where}: the mesh is not left-right symmetric (no one-to-one vertex mirror map); '
                           'mirroring (--mirror) needs a symmetric topology')
    return perm


def mirror_label(label: np.ndarray) -> np.ndarray:
    """(25+,) label -> label of the x-mirrored scene (see the module docstring)."""
    label = label.copy()
    cam = label[:16].reshape(4, 4)
    sign = np.array([-1, 1, 1, 1], dtype=label.dtype)
    label[:16] = (sign[:, None] * cam * sign[None, :]).reshape(-1)
    intr = label[16:25].reshape(3, 3)
    intr[0, 1] = -intr[0, 1]
    intr[0, 2] = 1 - intr[0, 2]
    label[16:25] = intr.reshape(-1)
    return label


# ----------------------------------------------------------------------------------------

class MeshImageDataset(torch.utils.data.Dataset):
    """Images with camera labels and the meshes that drive the generator.

    Item i -> (image (3, R, R) uint8, label (25 [+E],) float32, v (V + 68, 3) float32),
    v = mesh vertices then the 68 landmarks, canonical mesh metres. With `load_lms=False`
    the landmarks are zeros (the generator then has no mouth box).
    """

    def __init__(self,
        path: str,                      # root, images folder, or zip of either
        mesh_path: str = None,          # meshes folder (Next3D's --rdata); default: found from `path`
        resolution: int = None,         # expected resolution; None = from the data
        use_labels: bool = True,        # False: labels are zeros (unconditional D)
        xflip: bool = False,            # double the dataset with mirrored items
        max_size: int = None,           # keep a random subset of this many items
        random_seed: int = 0,           # seed of that subset
        load_lms: bool = True,          # load the 68 landmarks (else zeros)
        mirror_template: str = None,    # symmetric template .obj for the vertex mirror map
        validate: str = 'auto',         # 'full' checks every file up front, 'first' only the first; 'auto' = full up to FULL_VALIDATION_MAX items
    ):
        self.path = os.fspath(path)
        self._use_labels, self._xflip, self._load_lms = use_labels, xflip, load_lms
        self._files = _Files(self.path)
        self._image_prefix = self._find_image_prefix()
        self._label_name = self._find_label_file()
        self._labels_by_path = _labels_from_json(self._files, self._image_prefix + self._label_name, CAMERA_LABEL_DIM)

        image_names = sorted(n[len(self._image_prefix):] for n in self._files.names
                             if n.startswith(self._image_prefix) and n.lower().endswith(IMAGE_EXTS))
        if not image_names:
            raise DatasetError(f'{self._files.where(self._image_prefix or ".")}: the dataset holds no images')
        missing = [n for n in image_names if n not in self._labels_by_path]
        if missing:
            raise DatasetError(f'{self._files.where(self._image_prefix + self._label_name)}: no label for image {missing[0]}'
                               f' ({len(missing)} images without a label)')
        self._image_names = image_names

        self._exp = self._load_expressions()
        self._find_meshes(mesh_path)

        self._raw_idx = np.arange(len(image_names), dtype=np.int64)
        if max_size is not None and len(self._raw_idx) > max_size:
            np.random.RandomState(random_seed).shuffle(self._raw_idx)
            self._raw_idx = np.sort(self._raw_idx[:max_size])

        first = _decode_image(self._files, self._image_prefix + image_names[self._raw_idx[0]])
        self.resolution = first.shape[1]
        self._check_image_shape(first, image_names[self._raw_idx[0]], resolution)
        self.num_vertices = self._load_mesh(self._raw_idx[0], expected_count=None).shape[0] - NUM_LANDMARKS
        if validate == 'full' or (validate == 'auto' and len(self._raw_idx) <= FULL_VALIDATION_MAX):
            self._validate_all()
        self._mirror_perm = None
        if xflip:
            reference = self._load_mesh(self._raw_idx[0])[:-NUM_LANDMARKS] if mirror_template is None else self._read_template(mirror_template)
            self._mirror_perm = _mirror_permutation(reference, mirror_template or self._mesh_where(self._raw_idx[0]))
        self.name = os.path.splitext(os.path.basename(self.path.rstrip('/')))[0]

    # --- discovery ------------------------------------------------------------------------
    def _find_image_prefix(self) -> str:
        if any(name in self._files.names for name in LABEL_FILES):
            return ''
        tops = sorted({n.split('/')[0] for n in self._files.names if '/' in n})
        candidates = [t for t in tops if re.fullmatch(r'images\d+x\d+', t)
                      and any(f'{t}/{name}' in self._files.names for name in LABEL_FILES)]
        if len(candidates) != 1:
            raise DatasetError(f'{self.path}: no label file: expected {LABEL_FILES[0]} here or in exactly one images<R>x<R>/ folder'
                               + (f' (found {candidates})' if candidates else ''))
        return candidates[0] + '/'

    def _find_label_file(self) -> str:
        for name in LABEL_FILES:
            if self._image_prefix + name in self._files.names:
                return name
        raise AssertionError('unreachable')

    def _load_expressions(self):
        name = self._image_prefix + EXP_FILE
        if name not in self._files.names:
            return None
        exp = _labels_from_json(self._files, name)
        widths = {v.size for v in exp.values()}
        if len(widths) > 1:
            raise DatasetError(f'{self._files.where(name)}: expression labels of different lengths {sorted(widths)}')
        missing = [n for n in self._image_names if n not in exp]
        if missing:
            raise DatasetError(f'{self._files.where(name)}: no expression values for image {missing[0]}')
        return exp

    def _find_meshes(self, mesh_path):
        """Sets self._packed (vertices, landmarks arrays) or the mesh/landmark file sources."""
        self._packed = None
        prefix = self._image_prefix
        if mesh_path is None and prefix + PACKED_VERTICES in self._files.names:
            self._packed = self._load_packed()
            return
        if mesh_path is not None:
            mesh_path = os.fspath(mesh_path).rstrip('/')
            self._mesh_files, self._mesh_prefix = _Files(mesh_path), ''
            head, tail = os.path.split(mesh_path)
            lms_dir = os.path.join(head, tail.replace('meshes', 'lms'))
            self._lms_files, self._lms_prefix = (_Files(lms_dir), '') if lms_dir != mesh_path and os.path.isdir(lms_dir) else (None, '')
        elif prefix:    # root layout: sibling folders in the same folder or zip
            res = prefix[len('images'):-1]
            self._mesh_files, self._mesh_prefix = self._files, f'meshes{res}/'
            self._lms_files, self._lms_prefix = self._files, f'lms{res}/'
        else:           # `path` is the images folder: siblings on disk
            folder = os.path.basename(self.path.rstrip('/'))
            parent = os.path.dirname(os.path.abspath(self.path))
            if not folder.startswith('images') or self._files.is_zip:
                raise DatasetError(f'{self.path}: cannot find the meshes: name the images folder images<R>x<R> with a meshes<R>x<R> '
                                   f'sibling, pack the dataset with dataset_tool.py, or give the meshes folder (--rdata)')
            self._mesh_files, self._mesh_prefix = _Files(os.path.join(parent, 'meshes' + folder[len('images'):])), ''
            lms_dir = os.path.join(parent, 'lms' + folder[len('images'):])
            self._lms_files, self._lms_prefix = (_Files(lms_dir), '') if os.path.isdir(lms_dir) else (None, '')
        for rel in self._image_names:
            stem = os.path.splitext(rel)[0]
            if self._mesh_prefix + stem + '.obj' not in self._mesh_files.names:
                raise DatasetError(f'{self._mesh_files.where(self._mesh_prefix + stem + ".obj")}: missing mesh for image {rel}')
            if self._load_lms:
                if self._lms_files is None:
                    raise DatasetError(f'{self.path}: no landmarks folder (lms<R>x<R>) next to the meshes; '
                                       'give one or train with --load_lms=False')
                if self._lms_prefix + stem + '.txt' not in self._lms_files.names:
                    raise DatasetError(f'{self._lms_files.where(self._lms_prefix + stem + ".txt")}: missing landmarks for image {rel}')

    def _load_packed(self):
        """(vertices, landmarks, position of each sorted image in the arrays); folders are memory-mapped."""
        import io
        arrays = []
        for name in (PACKED_VERTICES, PACKED_LANDMARKS):
            full = self._image_prefix + name
            try:
                if self._files.is_zip:
                    arr = np.load(io.BytesIO(self._files.read(full)), allow_pickle=False)
                else:
                    arr = np.load(os.path.join(self.path, full), mmap_mode='r', allow_pickle=False)
            except (ValueError, OSError) as e:
                raise DatasetError(f'{self._files.where(full)}: unreadable array ({e})') from e
            arrays.append(arr)
        vertices, lms = arrays
        n = len(self._labels_by_path)
        if vertices.ndim != 3 or vertices.shape[0] != n or vertices.shape[2] != 3:
            raise DatasetError(f'{self._files.where(self._image_prefix + PACKED_VERTICES)}: shape {vertices.shape}, expected ({n}, V, 3)')
        if lms.shape != (n, NUM_LANDMARKS, 3):
            raise DatasetError(f'{self._files.where(self._image_prefix + PACKED_LANDMARKS)}: shape {lms.shape}, expected ({n}, 68, 3)')
        # The arrays follow dataset.json's label order; map each sorted image name to its row.
        pos = {name: i for i, name in enumerate(self._labels_by_path.keys())}
        return vertices, lms, np.array([pos[name] for name in self._image_names], dtype=np.int64)

    def _read_template(self, path):
        from training.mesh import obj_io
        try:
            return np.asarray(obj_io.read_obj_vertices(path, self.num_vertices), dtype=np.float32)
        except (ValueError, OSError) as e:
            raise DatasetError(_name_file(e, path, path)) from e

    # --- validation -----------------------------------------------------------------------
    def _check_image_shape(self, img, rel, resolution):
        where = self._files.where(self._image_prefix + rel)
        if img.shape[1] != img.shape[2]:
            raise DatasetError(f'{where}: image is {img.shape[2]}x{img.shape[1]}, expected square')
        r = img.shape[1]
        if r < 4 or r & (r - 1):
            raise DatasetError(f'{where}: resolution {r} is not a power of two')
        if img.shape[1] != self.resolution:
            raise DatasetError(f'{where}: image is {r}x{r}, the dataset is {self.resolution}x{self.resolution}')
        if resolution is not None and r != resolution:
            raise DatasetError(f'{where}: image is {r}x{r}, expected {resolution}x{resolution}')

    def _validate_all(self):
        for raw in self._raw_idx:
            rel = self._image_names[raw]
            self._check_image_shape(_decode_image(self._files, self._image_prefix + rel), rel, None)
            self._load_mesh(raw)

    def _mesh_where(self, raw):
        stem = os.path.splitext(self._image_names[raw])[0]
        if self._packed is not None:
            return self._files.where(self._image_prefix + PACKED_VERTICES)
        return self._mesh_files.where(self._mesh_prefix + stem + '.obj')

    # --- loading --------------------------------------------------------------------------
    def _load_mesh(self, raw: int, expected_count: int = -1) -> np.ndarray:
        """(V + 68, 3) float32 for raw index `raw` (not mirrored)."""
        if expected_count == -1:
            expected_count = self.num_vertices
        if self._packed is not None:
            row = self._packed[2][raw]
            verts, lms = np.asarray(self._packed[0][row], dtype=np.float32), np.asarray(self._packed[1][row], dtype=np.float32)
            if expected_count is not None and verts.shape[0] != expected_count:
                raise DatasetError(f'{self._mesh_where(raw)}: row {row} has {verts.shape[0]} vertices, expected {expected_count}')
        else:
            stem = os.path.splitext(self._image_names[raw])[0]
            verts = _read_vertices(self._mesh_files, self._mesh_prefix + stem + '.obj', expected_count)
            if expected_count is not None and verts.shape[0] != expected_count:
                raise DatasetError(f'{self._mesh_where(raw)}: {verts.shape[0]} vertices, the dataset\'s meshes have {expected_count}')
            if not np.isfinite(verts).all():
                raise DatasetError(f'{self._mesh_where(raw)}: non-finite vertex coordinates')
            if self._load_lms:
                lms = _read_landmarks(self._lms_files, self._lms_prefix + stem + '.txt')
            else:
                lms = np.zeros([NUM_LANDMARKS, 3], dtype=np.float32)
        if not self._load_lms:
            lms = np.zeros_like(lms)
        return np.concatenate([verts, lms], axis=0).astype(np.float32)

    def __len__(self) -> int:
        return len(self._raw_idx) * (2 if self._xflip else 1)

    @property
    def num_raw(self) -> int:
        return len(self._raw_idx)

    @property
    def label_dim(self) -> int:
        return CAMERA_LABEL_DIM + (0 if self._exp is None else next(iter(self._exp.values())).size)

    @property
    def has_labels(self) -> bool:
        return self._use_labels

    def _split(self, idx: int):
        if not 0 <= idx < len(self):
            raise IndexError(f'index {idx} out of range for a dataset of {len(self)} items')
        return int(self._raw_idx[idx % len(self._raw_idx)]), idx >= len(self._raw_idx)

    def get_label(self, idx: int) -> np.ndarray:
        """(label_dim,) float32; zeros when use_labels is False."""
        raw, flip = self._split(idx)
        if not self._use_labels:
            return np.zeros([self.label_dim], dtype=np.float32)
        rel = self._image_names[raw]
        label = self._labels_by_path[rel]
        if flip:
            label = mirror_label(label)
        if self._exp is not None:
            label = np.concatenate([label, self._exp[rel]])
        return label.astype(np.float32)

    def get_vertices(self, idx: int) -> np.ndarray:
        """(V + 68, 3) float32 mesh vertices and landmarks, mirrored for mirrored items."""
        raw, flip = self._split(idx)
        v = self._load_mesh(raw)
        if flip:
            verts, lms = v[:-NUM_LANDMARKS], v[-NUM_LANDMARKS:]
            verts = verts[self._mirror_perm] * np.array([-1, 1, 1], dtype=np.float32)
            lms = lms[LANDMARK_MIRROR] * np.array([-1, 1, 1], dtype=np.float32)
            v = np.concatenate([verts, lms], axis=0)
        return np.ascontiguousarray(v, dtype=np.float32)

    def get_image(self, idx: int) -> np.ndarray:
        raw, flip = self._split(idx)
        rel = self._image_names[raw]
        img = _decode_image(self._files, self._image_prefix + rel)
        self._check_image_shape(img, rel, None)
        if flip:
            img = img[:, :, ::-1]
        return np.ascontiguousarray(img)

    def __getitem__(self, idx: int):
        return self.get_image(idx), self.get_label(idx), self.get_vertices(idx)

    def get_details(self, idx: int) -> dict:
        raw, flip = self._split(idx)
        return dict(raw_idx=raw, xflip=flip, relpath=self._image_names[raw])

    def image_shape(self):
        return [3, self.resolution, self.resolution]

    def raw_records(self):
        """Yield, for every raw item in order (no mirroring): dict(relpath, image_bytes, camera (25,),
        expression (E,) or None, vertices (V, 3), landmarks (68, 3)). For packing the dataset."""
        for raw in self._raw_idx:
            rel = self._image_names[raw]
            v = self._load_mesh(raw)
            yield dict(relpath=rel, image_bytes=self._files.read(self._image_prefix + rel), camera=self._labels_by_path[rel],
                       expression=None if self._exp is None else self._exp[rel],
                       vertices=v[:-NUM_LANDMARKS], landmarks=v[-NUM_LANDMARKS:])

    def close(self):
        self._files.close()
