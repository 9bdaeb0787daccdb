"""Caption-keyed codes (``method: keyed``): config (:mod:`.config`), the code (:mod:`.code`),
the method as the pipeline sees it (:mod:`.method`)."""
