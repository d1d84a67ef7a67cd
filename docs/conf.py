"""Sphinx configuration of jaxnorm's documentation site.

Build it from a clone (what `.ci/run` does, with warnings as errors)::

    pip install -e ".[docs]"
    sphinx-build -W --keep-going -b html docs docs/_build/html

The API reference is generated (by autosummary, into `docs/api/generated/`) from the `__all__`
of each public module listed in `docs/api/index.md`; the guides are the pages of
`docs/guides/`, listed in reading order in `docs/guides/index.md` (a new guide must be added
there: Sphinx warns about a page in no toctree, an error under -W). Nothing is fetched at build or
read time: no intersphinx, and MathJax is served from the site itself.
"""

from __future__ import annotations

import inspect
import pathlib
import re
import sys

from docutils import nodes
from sphinx.util import logging
from sphinx.util.nodes import make_refnode

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's jaxnorm, also without `pip install -e`

import jaxnorm  # noqa: E402 (after the sys.path entry that makes it the checkout's)

logger = logging.getLogger("jaxnorm.docs")

project = "jaxnorm"
author = "the jaxnorm authors"
copyright = "the jaxnorm authors"
release = version = jaxnorm.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax 3 copied into the site: math renders offline
    "sphinx_copybutton",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_templates", "**/.ipynb_checkpoints"]
templates_path = ["_templates"]

# Markdown (MyST): $...$ and $$...$$ math, ::: fences, anchors for ## and ### headings.
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# Docstrings: Google style (napoleon), `single backticks` are cross-references where they name
# a documented object and code otherwise (see _resolve_jaxnorm_names below).
default_role = "py:obj"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_attr_annotations = True
napoleon_use_rtype = False  # "Returns: (y, new_state) – ...", not a separate "Return type"
autosummary_generate = True
autosummary_ignore_module_all = False  # a module's page lists exactly its __all__
autosummary_imported_members = False
autodoc_member_order = "bysource"
# Signatures read like calls (`batch_norm(x, state, scale=None, ..., *, training, ...)`); each
# documented argument carries its type in the list below.
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
autodoc_type_aliases = {
    "ArrayLike": "jax.typing.ArrayLike",
    "DTypeLike": "jax.typing.DTypeLike",
    "Axes": "flax.typing.Axes",
    "Dtype": "flax.typing.Dtype",
    "Initializer": "flax.typing.Initializer",
    "PromoteDtypeFn": "flax.typing.PromoteDtypeFn",
}
python_maximum_signature_line_length = 90
python_display_short_literal_types = True
add_module_names = False
python_use_unqualified_type_names = True
toc_object_entries_show_parents = "hide"

# Doctest sessions (`>>> `) get a copy button that copies only the code.
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True

html_theme = "furo"
html_title = f"jaxnorm {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_show_sourcelink = False
html_theme_options = {"navigation_with_keys": True}


def _public_object_names(env) -> dict[str, list[str]]:
  """Maps each suffix (`moments`, `linen.BatchNorm`) of a documented jaxnorm function, class
  or module to the full names it ends."""
  by_suffix: dict[str, list[str]] = {}
  for name, _, objtype, _, _, _ in env.domains["py"].get_objects():
    if objtype not in ("function", "class", "module", "exception") or not name.startswith(
        "jaxnorm"):
      continue
    parts = name.split(".")
    for i in range(len(parts)):
      by_suffix.setdefault(".".join(parts[i:]), []).append(name)
  return by_suffix


_NAME = re.compile(r"^(?:jn\.|jnn\.|jnnx\.)?([A-Za-z_][\w.]*)(?:\(.*\))?$")


def _resolve_jaxnorm_names(app, env, node, contnode):
  """Resolves `moments`, `jn.moments`, `jaxnorm.linen.BatchNorm` or `batch_norm_init(3)` to
  the one jaxnorm object of that name from any page, and fails the build (a warning, an error
  under -W) on a reference that names `jaxnorm.something` that is not documented.

  A single-backtick text that names no jaxnorm object (`x`, `E[x²] - E[x]²`,
  `flax.linen.BatchNorm`) stays code, without a warning.
  """
  if node.get("refdomain") != "py":
    return None
  target = node.get("reftarget", "")
  match = _NAME.match(target)
  if match is None:
    return None
  # `jaxnorm._stats.Moments` (a type hint, named by where it is defined) is `jaxnorm.Moments`.
  name = ".".join(part for part in match.group(1).split(".") if not part.startswith("_"))
  if target.startswith(("jnn.", "jnnx.")):
    name = ("linen." if target.startswith("jnn.") else "nnx.") + name
  candidates = _public_object_names(env).get(name, [])
  if len(candidates) > 1:  # e.g. BatchNorm: linen's and nnx's; prefer the core's, if any
    candidates = [c for c in candidates if c == f"jaxnorm.{name}"] or candidates
  if len(candidates) == 1:
    docname, node_id = env.domains["py"].objects[candidates[0]][:2]
    return make_refnode(app.builder, node["refdoc"], docname, node_id, contnode, candidates[0])
  if name.startswith("jaxnorm."):
    logger.warning("broken reference to %s: no such public object is documented", target,
                   location=node)
  return None


# `BatchStat`s: a plural "s" right after a closing backtick is fine in a docstring but ends no
# interpreted text in reST; an escaped space (`BatchStat`\\ s) renders as `BatchStat`s.
_PLURAL = re.compile(r"(?<![`\w])(`[^`]+`)(?=\w)")


def _prepare_docstring(app, what, name, obj, options, lines):
  """Escapes such plurals; a public function, class or module without a docstring fails the
  build."""
  lines[:] = [_PLURAL.sub(r"\1\\ ", line) for line in lines]
  if what in ("function", "class", "module") and not any(line.strip() for line in lines):
    logger.warning("%s %s has no docstring", what, name)


_SIGNATURE_CLEANUPS = (
    # `x: ArrayLike | None`: the alias's name, not the repr of Sphinx's alias object.
    (re.compile(r"TypeAliasForwardRef\('([^']+)'\)"), r"\1"),
    # The defaults of a dataclass's generated __init__ (flax modules): names, not reprs.
    (re.compile(r"<class '([\w.]+)'>"), r"\1"),
    (re.compile(r"<function ([\w.]+)(?: at 0x[0-9a-f]+)?>"), r"\1"),
    # flax.linen's bookkeeping fields, not arguments a user passes.
    (re.compile(r",\s*parent(?::[^=,]*)?=\s*<flax[^>]*>"), ""),
    (re.compile(r",\s*name(?::[^=,]*)?=\s*None(?=\))"), ""),
)


def _clean_signature(app, what, name, obj, options, signature, return_annotation):
  """Signatures as a reader writes the call, and the parameter types of the description.

  With `autodoc_type_aliases`, Sphinx stringifies an alias inside a union (`x: ArrayLike |
  None`) as the repr of its placeholder object, `TypeAliasForwardRef('jax.typing.ArrayLike') |
  None`, in the types it records for `autodoc_typehints = "description"` (it runs before this
  handler, at the same event): those recorded types are cleaned here too.
  """
  def clean(s):
    if s is None:
      return None
    for pattern, repl in _SIGNATURE_CLEANUPS:
      s = pattern.sub(repl, s)
    return s

  recorded = app.env.current_document.autodoc_annotations.get(name, {})
  for param, annotation in recorded.items():
    recorded[param] = clean(annotation)

  if what == "class" and signature == "(*args, **kwargs)":  # flax.nnx's metaclass hides __init__
    init = inspect.signature(obj.__init__)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in init.parameters.values()]
    signature = str(init.replace(parameters=params[1:],
                                 return_annotation=inspect.Signature.empty))
  return clean(signature), clean(return_annotation)


def _only_own_methods(app, what, name, obj, skip, options):
  """A class page documents its own methods (`__call__`, ...). Its fields are documented once,
  by the docstring's `Attributes:` section: not again from their values (a NamedTuple field
  getter, flax's `initializers.zeros` as a default, a dtype)."""
  if what != "class":  # (autosummary asks with what="class" about a class itself, too)
    return None
  own = (inspect.isfunction(obj) or inspect.isclass(obj) or isinstance(obj, property)) and (
      getattr(obj, "__module__", "") or "").startswith("jaxnorm")
  return True if not own else None


def _mark_tables_of_figures(app, doctree):
  """Marks a table whose cells after the first column are all short (figures: `7.5e-5`,
  `1562 µs (58%)`) so that those cells do not wrap (custom.css); tables of prose wrap."""
  for table in doctree.findall(nodes.table):
    rows = list(table.findall(nodes.row))
    cells = [entry.astext() for row in rows for entry in list(row.findall(nodes.entry))[1:]]
    if cells and max(len(c) for c in cells) <= 24:
      table["classes"].append("figures")


def setup(app):
  app.connect("doctree-read", _mark_tables_of_figures)
  app.connect("missing-reference", _resolve_jaxnorm_names)
  app.connect("autodoc-process-docstring", _prepare_docstring)
  app.connect("autodoc-skip-member", _only_own_methods)
  app.connect("autodoc-process-signature", _clean_signature)
