"""The ``natgrad`` command line: one module per subcommand (``train``, ``compare``, ``fisher``).

The library never imports this package; it builds on :mod:`natgrad.data`, :mod:`natgrad.models`,
:mod:`natgrad.optim`, :mod:`natgrad.nn` and :mod:`natgrad.fisher`.
"""
