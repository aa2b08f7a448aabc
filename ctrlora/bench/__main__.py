"""`python -m ctrlora.bench [overrides]` (`make bench ARGS="bench.model=llama2-7b"`)."""

import sys

from ctrlora.bench import main

if __name__ == "__main__":
    main(sys.argv[1:])
