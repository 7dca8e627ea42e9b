"""Transcriptions of the methods' official code (where it is not an installable package).

Each module transcribes the authors' code for one method into numpy (or torch, from the `parity`
extra), every line citing its source as `repo@commit:path:line`. Tests run colax beside these;
they are references, never imported by colax.
"""
