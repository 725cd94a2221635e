"""The method's compiled programs: the train step (one micro-batch scan for SFT and DPO), the
influence kernel and its memory plan, the DPO loss and log-probs, the sampler, the scorer. No
file I/O and no resume: the stages own those."""
