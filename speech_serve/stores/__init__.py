"""The voiceprint and hotword store's backends (the interface and `open_store`: speech_serve/voiceprints.py).

base.py: what every backend is and returns. sql.py: the queries both SQL backends run. migrations.py:
their numbered schema steps. sqlite.py: one file on one host (the default). postgres.py: a server that
every pod of a cluster shares.
"""
