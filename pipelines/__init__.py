"""Backend pipelines (ffcv, DALI, PIL reference) and the batch ops they share; installed as fastload.pipelines."""
