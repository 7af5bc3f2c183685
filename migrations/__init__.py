"""qgate's Alembic script directory (``env.py``, ``versions/``), shipped as a package.

It is a package so that a wheel carries it and :func:`qgate.core.db.migrate.migrations_dir`
finds it with :mod:`importlib.resources` wherever qgate is installed, not only next to a
source checkout. Alembic loads ``env.py`` and the revision files by path; nothing here is
imported for its code.
"""

#: Checked by qgate.core.db.migrate: another project's ``migrations`` package (a Django app in
#: the working directory, say) must not be mistaken for this one.
OWNER = "qgate"
