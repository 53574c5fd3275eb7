"""``python -m lidu_jax``: the synthetic LiDu study (see `lidu_jax.synthetic_study`)."""

import sys

from lidu_jax.synthetic_study import main

if __name__ == "__main__":
    sys.exit(main())
