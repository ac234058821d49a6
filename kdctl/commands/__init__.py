"""The command layer: what each CLI command does, as plain functions (the Typer layer in :mod:`kdctl.cli` only
parses options). It is the only layer that prints; the computations live in the library modules it calls.

One module per group of commands: :mod:`.inspect`, :mod:`.data`, :mod:`.evaluate`, :mod:`.train`, :mod:`.export`
(export and push-to-hub), :mod:`.quickstart`; :mod:`.output` holds the console, warnings and tables.
"""
