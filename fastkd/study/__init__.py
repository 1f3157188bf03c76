"""The distillation study behind the ``fastkd`` command (``pip install "fastkd[study]"``).

An application of the library, beside it: these modules import fastkd's public modules, and
nothing in the library imports them (``import fastkd`` stays free of the study and its packages).
The command is :mod:`fastkd.study.cli` (``fastkd distill``, ``fastkd cache-teacher``).
"""
