"""The prune pipeline: steps (targets, plan, calibration, jobs, install, report, distributed), two runners, one entry.

Imports point one way: :mod:`.entry` calls a runner (:mod:`.one_pass`, :mod:`.blocks`), a runner calls the
steps, and no step imports a runner or the entry. Public names are re-exported by ``dsf_lightning``; this
package's ``__init__`` imports nothing, so a step can be imported without the rest.
"""
