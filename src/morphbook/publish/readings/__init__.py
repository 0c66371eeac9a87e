"""The chapters' readings: sentences computed from results, each true under the condition its code states.

One module per chapter; ``texts(...)`` takes the chapter's headline and detail files (plain dicts and
lists, as the page reads them) and returns ``{key: Markdown sentence}`` for ``publish.glue.glue_all``.
A sentence that says a claim holds, or does not, says so through a comparison made here, never
through words typed on the page, so the prose follows the numbers when a rerun moves them.
"""
