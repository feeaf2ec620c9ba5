"""Learned rotations (FRTQ), torch only: the grid-to-std objective
(``objectives``), orthogonal parameterizations and block products (``orthogonal``),
and the learning problem and solver (``frtq``)."""
