"""morphbook: the book's experiments (one module per chapter) and its publishing plumbing.

* ``morphbook.chapters`` — the registry: each chapter's name, number, title, notebook and experiment module;
* ``morphbook.experiments.<chapter>`` — the compute: ``Config.for_profile(profile, **overrides)`` and
  ``run(cfg) -> Result`` (headline figures + detail files); imports only ``morphlib`` and sibling
  experiment helpers, never the publishing side;
* ``morphbook.publish`` — results store and provenance, code hashes and the stale check, page
  banners, the findings table, charts.

Imports point one way: ``morphlib`` <- ``morphbook.experiments`` <- ``morphbook.publish`` <- notebooks.
"""
