"""Alembic migrations for meshca's database (run by :func:`meshca.store.migrate.upgrade`).

This directory is a package so that a regular wheel carries ``env.py`` and the revision
scripts; ``script.py.mako`` ships as package data.
"""
