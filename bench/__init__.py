"""convzoo benchmarks against the peers. Run ``python -m bench --quick``."""
