"""FMSeg's Slicer module library: the headless Logic (``logic``) and the panel's behaviour (``panel``).

Nothing is imported here, so that ``panel`` can be imported (and tested) without Slicer.
"""
