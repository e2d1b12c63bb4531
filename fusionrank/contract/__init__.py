"""What every part agrees on: the pipeline spec (`spec/`), the tensor contract (`tensors`), the names of the
modalities and models (`names`), typed errors, the admin key's wire form, where project files live."""
