"""convzoo against its peers: ``convzoo-bench --quick`` (or ``python -m convzoo.tools.bench``).

``ops`` holds the benched problems and providers (each family's built in ``ops_patches`` or ``ops_sparse``),
``harness`` times them and writes the results, ``cli`` is the command line; ``bench/`` at the top of a checkout
runs the same problems under pytest-benchmark.
"""
