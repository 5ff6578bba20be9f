"""The admin API (separate admin key): tenants now, adapters next."""
