"""What several ops share, under public names: the environment (:mod:`.env`), the margin math on
``(B,)`` vectors (:mod:`.margin`), the Triton tile helpers and tile configurations (:mod:`.tiles`), the
chunked-torch helpers (:mod:`.chunked`) and the gradient epilogues (:mod:`.epilogue`)."""
