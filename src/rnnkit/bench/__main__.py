"""``python -m rnnkit.bench [--quick] [--json PATH] [--threads N]``."""

from rnnkit.bench.run import main

if __name__ == "__main__":
    main()
