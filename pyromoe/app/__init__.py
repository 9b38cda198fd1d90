"""The application: the ``pyromoe`` command line, the demo and fit workflows, plots and files."""
