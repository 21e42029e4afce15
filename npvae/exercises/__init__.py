"""Exercises for a course on VAEs: write the backward passes, find the planted bugs.

``npvae exercises new DIR`` writes twelve fill-in-the-backward files (``fill/``) and six
bug hunts (``bugs/``) into a new folder; ``npvae exercises check DIR`` grades them
(:mod:`npvae.exercises.grader`); ``npvae exercises solutions DIR`` writes the solved files.
The files themselves live in ``templates/`` and ``solutions/`` beside this module
(:mod:`npvae.exercises.files`).
"""
