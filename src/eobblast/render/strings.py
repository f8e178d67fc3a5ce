"""The words of an EOB notice in each supported language (English is the fallback)."""

from __future__ import annotations

from typing import Final

STRINGS: Final[dict[str, dict[str, str]]] = {
    "en": {
        "subject": "Your Explanation of Benefits is ready",
        "title": "Explanation of Benefits",
        "not_a_bill": "THIS IS NOT A BILL",
        "greeting": "Dear {name},",
        "intro": "{payer} processed a claim for care you received. "
        "This notice explains what was billed, what your plan paid and what you may owe.",
        "patient": "Patient",
        "claim_number": "Claim number",
        "provider": "Provider",
        "service_dates": "Service dates",
        "processed": "Processed on",
        "service": "Service",
        "code": "Code",
        "billed": "Billed",
        "allowed": "Allowed",
        "deductible": "Deductible",
        "copay": "Copay",
        "coinsurance": "Coinsurance",
        "plan_paid": "Plan paid",
        "you_owe": "You may owe",
        "remarks": "Remark codes",
        "totals": "Totals",
        "accumulators": "Your progress this plan year",
        "deductible_met": "Deductible met",
        "oop_met": "Out-of-pocket maximum met",
        "of": "of",
        "appeal_title": "Your right to appeal",
        "appeal_deadline": "If you disagree with this decision, you may appeal until {date}.",
        "footer": "Please keep this notice for your records. Your provider may bill you "
        "for the amount shown under 'You may owe'.",
        "notice_subject": "A new Explanation of Benefits is waiting for you",
        "notice_greeting": "Dear member,",
        "notice_body": "{payer} has a new Explanation of Benefits for you. To protect your "
        "privacy it is on our secure site rather than in this email.",
        "notice_action": "View your Explanation of Benefits",
        "notice_identity": "You will be asked for your date of birth and the last 4 digits "
        "of your member ID. The link works once and expires on {date}.",
        "notice_footer": "If you did not expect this message, you can ignore it. We will never "
        "ask for your password by email.",
    },
    "es": {
        "subject": "Su Explicación de Beneficios está disponible",
        "title": "Explicación de Beneficios",
        "not_a_bill": "ESTO NO ES UNA FACTURA",
        "greeting": "Estimado/a {name}:",
        "intro": "{payer} procesó una reclamación por la atención que usted recibió. "
        "Este aviso explica lo que se facturó, lo que pagó su plan y lo que usted podría deber.",
        "patient": "Paciente",
        "claim_number": "Número de reclamación",
        "provider": "Proveedor",
        "service_dates": "Fechas de servicio",
        "processed": "Procesada el",
        "service": "Servicio",
        "code": "Código",
        "billed": "Facturado",
        "allowed": "Permitido",
        "deductible": "Deducible",
        "copay": "Copago",
        "coinsurance": "Coseguro",
        "plan_paid": "Pagó el plan",
        "you_owe": "Usted podría deber",
        "remarks": "Códigos de observación",
        "totals": "Totales",
        "accumulators": "Su progreso en este año del plan",
        "deductible_met": "Deducible cubierto",
        "oop_met": "Máximo de gastos de bolsillo cubierto",
        "of": "de",
        "appeal_title": "Su derecho a apelar",
        "appeal_deadline": "Si no está de acuerdo con esta decisión, puede apelar hasta el {date}.",
        "footer": "Conserve este aviso para sus registros. Su proveedor puede facturarle "
        "la cantidad indicada en 'Usted podría deber'.",
        "notice_subject": "Tiene una nueva Explicación de Beneficios",
        "notice_greeting": "Estimado/a afiliado/a:",
        "notice_body": "{payer} tiene una nueva Explicación de Beneficios para usted. Para "
        "proteger su privacidad, está en nuestro sitio seguro y no en este correo.",
        "notice_action": "Ver su Explicación de Beneficios",
        "notice_identity": "Se le pedirá su fecha de nacimiento y los últimos 4 dígitos de su "
        "número de afiliado. El enlace funciona una sola vez y vence el {date}.",
        "notice_footer": "Si no esperaba este mensaje, puede ignorarlo. Nunca le pediremos su "
        "contraseña por correo electrónico.",
    },
}


def language_key(language: str) -> str:
    """The key in STRINGS that serves a BCP 47 language tag, falling back to English."""
    key = language.split("-")[0]
    return key if key in STRINGS else "en"
