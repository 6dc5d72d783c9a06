"""``python -m cerberus_histo`` runs the ``cerberus`` command. The guard matters: a worker process started with
``spawn`` imports this module again (as ``__mp_main__``) and must not run the command a second time."""

from .cli import main

if __name__ == "__main__":
    main()
