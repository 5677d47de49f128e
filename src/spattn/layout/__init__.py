"""The block-sparse Layout format and its one codec (imports nothing else from spattn).

* :mod:`spattn.layout.layout` — the :class:`Layout` dataclass (tables, counts, density, repr);
* :mod:`spattn.layout.tables` — the codec: ``pack``, ``classify``, ``dedupe``, ``unpack``, ``entries``;
* :mod:`spattn.layout.dense` — ``from_dense`` / ``to_dense`` (exact token masks, small lengths);
* :mod:`spattn.layout.blockmask` — torch ``BlockMask`` ⇄ Layout;
* :mod:`spattn.layout.show` — the █▒░ string and the plot.
"""

from spattn.layout.dense import from_dense, to_dense
from spattn.layout.layout import Layout
from spattn.layout.tables import EMPTY, FULL, PARTIAL

__all__ = ["EMPTY", "FULL", "PARTIAL", "Layout", "from_dense", "to_dense"]
