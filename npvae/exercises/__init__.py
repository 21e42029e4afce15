"""Exercises for a course on VAEs: write the backward passes, find the planted bugs.

``npvae exercises new DIR`` writes twelve fill-in-the-backward files (``fill/``) and six
bug hunts (``bugs/``) into a new folder; ``npvae exercises check DIR`` grades them
(:mod:`npvae.exercises.grader`); ``npvae exercises solutions DIR`` writes the solved files.
Both are made from the solved files in ``solutions/`` beside this module, the bug hunts
with the stories and bugs of :mod:`npvae.exercises.hunts` (:mod:`npvae.exercises.files`).
"""
