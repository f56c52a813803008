"""``python -m gcl.data.world OUT --samples N --seed S``: see :func:`gcl.data.world.write.main`."""
from gcl.data.world.write import main

if __name__ == "__main__":
    main()
