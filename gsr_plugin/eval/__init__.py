"""What we measure on: the default model offline (``models``), WikiText-2 and PIQA
(``data``), the perplexity protocol (``perplexity``) and ``gsr eval`` (``evaluate``)."""
