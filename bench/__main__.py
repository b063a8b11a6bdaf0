import sys

from bench import run

if __name__ == "__main__":
    if len(sys.argv) < 2:
        print("usage: python -m bench NAME [options]", file=sys.stderr)
        sys.exit(2)
    sys.exit(run(sys.argv[1], sys.argv[2:]))
